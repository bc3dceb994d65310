"""The labelling web server: people answer the loop's preference queries in a browser.

  python -m pilaf_jax.label_server --workdir=<run>          # serve (localhost:8765)
  python -m pilaf_jax.label_server add-labeller --workdir=<run> --name=alice

See app.py for the routes and the security model, and README.md, "Labelling by people".
"""
