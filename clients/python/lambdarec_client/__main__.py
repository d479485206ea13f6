import sys

from lambdarec_client.cli import main

sys.exit(main())
