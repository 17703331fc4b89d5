import sys

from lightmotion_fast.cli import main

sys.exit(main())
