"""Cluster backends: where camera nodes and their labels come from, and where assignments go.

- ``base``: the ``Cluster`` interface, nodes and events, and the static inventory backend.
- ``kubernetes``: the Kubernetes backend (list, watch and label nodes; review tokens and
  read pods for the certificate bootstrap).
- ``selectors``: Kubernetes label selectors.
"""
