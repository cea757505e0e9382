"""The hub's certificate authority: one X.509 identity per node, consumer, hub and server.

- ``ca``: create or load the CA, issue a certificate for a name and role, sign a CSR for
  exactly one name (the K3s bootstrap), read a certificate's name and role back.
- ``bootstrap``: whether an agent pod gets a certificate, and for which node: a TokenReview of
  its projected token, its pod checked, then the CA signs (``hub/api/pki.py`` serves it).
"""
