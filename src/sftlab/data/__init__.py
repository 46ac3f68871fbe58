"""Data stage: readers, formats, templates, tokenize + mask, report."""
