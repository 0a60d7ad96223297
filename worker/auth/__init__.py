"""OAuth2 tokens: the only importer of the token libraries (MSAL, google-auth, cryptography)."""
