import sys

from lora_bench.cli import main

sys.exit(main())
