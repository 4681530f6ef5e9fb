import sys

from rela.cli import main

sys.exit(main())
