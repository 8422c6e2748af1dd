"""Research code outside the installed package (run from the repository root): the sparse study,
``python -m research.study``. Nothing in ``lld_lightning`` imports it."""
