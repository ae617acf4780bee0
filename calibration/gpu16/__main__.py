"""``python -m calibration.gpu16 --out DIR [--budget-s 270] [--lease N]``: one lease (see ``run``)."""
import sys

from calibration.gpu16.run import main

sys.exit(main())
