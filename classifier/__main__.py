"""`python -m classifier ...`"""

import sys

from classifier.cli import main

sys.exit(main())
