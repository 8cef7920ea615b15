"""`python -m melodi_t5x.tools.tpu_compile`: see the package docstring and `cli`."""

from melodi_t5x.tools.tpu_compile import cli

if __name__ == '__main__':
  raise SystemExit(cli.main())
