"""Model tooling: generated test models (generate.py) and the offline build (build.py)."""
