import sys

from shardquant.cli import main

sys.exit(main())
