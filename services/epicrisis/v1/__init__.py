"""Generated from protos/epicrisis/v1 by ``python protos/generate.py``: do not edit by hand."""
