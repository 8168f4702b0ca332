"""``just bench``: tproxy side by side with direct and HAProxy in network namespaces (never part of ``just test``)."""
