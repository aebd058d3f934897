"""agrivlm field explorer (Streamlit).

Start it with ``agrivlm explore --stack PATH`` (safe server settings); the page's logic lives in
:mod:`agrivlm.explore`.
"""

from agrivlm.explore.page import main

main()
