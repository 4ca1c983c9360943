import os
import sys

# helpers beside these tests (hf_models.py) and tests/ (hf_random.py) import by name, also in
# forked workers
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "parallel"))  # spawn()
