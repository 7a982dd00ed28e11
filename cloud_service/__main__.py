"""``python -m cloud_service [--config FILE] [--host H] [--port P] [--fd N]`` -- same as ``hybrid-router serve``."""

import sys

from cloud_service.cli import main

if __name__ == "__main__":
    sys.exit(main())
