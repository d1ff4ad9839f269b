"""`python -m strategies.control pretrain|compare`: see `strategies.control.pretrain`."""

import sys

from strategies.control.pretrain import main

sys.exit(main())
