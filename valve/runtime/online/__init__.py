"""The online side: the request signal (`signal`) and the reverse proxy sidecar (`proxy`)."""
