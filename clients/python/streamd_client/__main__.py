import sys

from streamd_client.cli import main

sys.exit(main())
