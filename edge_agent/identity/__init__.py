"""This node's own certificate: obtained from the hub on K3s, renewed before it ends.

- ``files``: the key and certificate on the node's volume (a new P-256 key per request, written
  0600 and atomically), the CSR, and what a certificate on disk says (whose, until when,
  whether it matches its key).
- ``keeper``: asks the hub (``POST /v1/pki/bootstrap`` with the pod's projected ServiceAccount
  token), keeps a valid certificate in ``mqtt.cert_file``/``mqtt.key_file`` at start, renews it
  at ``identity.renew_at`` of its life with backoff on failure, and tells its owner (the MQTT
  link reconnects with the new one, the outbox holds results meanwhile).
"""
