"""Every process of a service: finding them (discover), choosing them (targets), one
operation over many (multi), ``ps``, and the patch directory new processes load (patchdir)."""
