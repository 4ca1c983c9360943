"""The data-curation pipeline (installed as `megaqwen.data_pipeline`)."""

if __name__ == "data_pipeline":  # run from the repo root: see megaqwen/_toplevel.py
    from megaqwen._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
