"""Fused kernels with a plain-PyTorch reference each (installed as `megaqwen.kernels`)."""

if __name__ == "kernels":  # run from the repo root: see megaqwen/_toplevel.py
    from megaqwen._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
