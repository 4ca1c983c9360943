import os
import sys

# the multi-process harness is a plain module beside these tests (forked workers import it by name)
sys.path.insert(0, os.path.dirname(__file__))
