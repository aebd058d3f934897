"""``agrivlm quickstart``: the main job on the embedded sample (or your stack), and its HTML report.

:mod:`agrivlm.quickstart.run` runs the steps (ingest → recipe → fine-tune → infer → eval → report);
:mod:`agrivlm.quickstart.report` writes ``report.html`` from what they left.
"""

from agrivlm.quickstart.options import QuickstartOptions
from agrivlm.quickstart.run import Quickstart

__all__ = ["Quickstart", "QuickstartOptions"]
