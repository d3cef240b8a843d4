import sys

from token_budget.cli import main

sys.exit(main())
