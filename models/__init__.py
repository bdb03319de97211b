"""The shipped models, as package data of `mdx.models` (this folder, mapped by pyproject.toml).

Nothing to import here: the runtime finds the files with `importlib.resources` through
`mdx.runtime.shipped`, and `mdx-sample --model emoji16` names them. See README.md (the card).
"""
