"""The field explorer: a Streamlit map of a stack with predicted and true fields, NDVI curves and growth stages.

Logic lives here (inputs, overlay, map layers, curves, positions, launcher); ``app/field_explorer.py`` is
the thin Streamlit script and :mod:`agrivlm.explore.page` the page. Importing this package does not
import Streamlit.
"""

from agrivlm.explore.errors import ExploreError
from agrivlm.explore.settings import ExploreSettings

__all__ = ["ExploreError", "ExploreSettings"]
