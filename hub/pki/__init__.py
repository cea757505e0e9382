"""The hub's certificate authority: one X.509 identity per node, consumer, hub and server.

- ``ca``: create or load the CA, issue a certificate for a name and role, sign a CSR for
  exactly one name (the K3s bootstrap), read a certificate's name and role back.
"""
