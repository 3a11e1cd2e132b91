"""``python -m onnxgrad.cli``: the same as the ``onnxgrad`` command."""

from onnxgrad.cli import main

main()
