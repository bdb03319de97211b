"""`python -m mdx.train` = `mdx-train` (what torchrun launches)."""

from mdx.train.cli import main

main(prog_name="mdx-train")
