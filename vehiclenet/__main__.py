"""``python -m vehiclenet`` runs the command line."""
import sys

from vehiclenet.cli import main  # absolute: MindSpore resolves the entry script's imports without a package

sys.exit(main())
