import os
import sys

# tests import their helpers (_helpers, _tolerances) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
