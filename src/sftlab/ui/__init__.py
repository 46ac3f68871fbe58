"""`sftlab ui`: a local web dashboard over a folder of runs (see sftlab.ui.app)."""
