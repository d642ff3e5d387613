import sys

from lora_bench.warm import delegate, wanted

# A training command hands itself to the warm worker before importing anything else (lora_bench.warm): the
# client side of a forked run then costs an interpreter start and this module, not the CLI's imports.
if sys.argv[1:2] == ["train"] and wanted():
    code = delegate(sys.argv[1:])
    if code is not None:
        sys.exit(code)

from lora_bench.cli import main  # noqa: E402

sys.exit(main())
