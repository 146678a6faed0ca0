import sys

from cxrray.score.cli import main

sys.exit(main())
