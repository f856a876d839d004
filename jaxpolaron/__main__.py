import sys

from jaxpolaron.cli import main

sys.exit(main())
