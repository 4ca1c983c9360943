"""The trainer's Hydra configs (installed as `megaqwen.conf`)."""

if __name__ == "conf":  # run from the repo root: see megaqwen/_toplevel.py
    from megaqwen._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
