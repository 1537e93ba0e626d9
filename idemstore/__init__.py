"""idemstore: idempotency keys in SQL, compatible with the tandem JSON key store."""
