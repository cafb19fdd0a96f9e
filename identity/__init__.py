"""Who is who: a local CA and TLS identities (:mod:`identity.pki`), single-use enrolment tokens
and certificate requests (:mod:`identity.enrolment`), and the one writer of secret files
(:mod:`identity.secret_files`)."""
