/* api.c - the calls of fentry.h that programs linked with the shim make: apply, revert, unload. */
#include <stdio.h>

#include "core/activate.h"
#include "core/audit.h"
#include "fentry.h"

/* The verbs write up to FENTRY_ERR_MAX bytes; the caller's buffer may be smaller. */
static int copy_result(int rc, const char *buf, char *err, size_t errlen)
{
	if (rc < 0 && err && errlen)
		snprintf(err, errlen, "%s", buf);
	return rc < 0 ? -1 : 0;
}

int fentry_apply(const char *path, char *err, size_t errlen)
{
	struct fentry_peer me = fentry_peer_self(FENTRY_VIA_API);
	char buf[FENTRY_ERR_MAX];

	return copy_result(fentry_audited_apply(&me, path, NULL, buf), buf, err, errlen);
}

int fentry_revert(const char *name, char *err, size_t errlen)
{
	struct fentry_peer me = fentry_peer_self(FENTRY_VIA_API);
	char buf[FENTRY_ERR_MAX];

	return copy_result(fentry_audited_revert(&me, name, buf), buf, err, errlen);
}

int fentry_unload(const char *name, char *err, size_t errlen)
{
	struct fentry_peer me = fentry_peer_self(FENTRY_VIA_API);
	char buf[FENTRY_ERR_MAX];

	return copy_result(fentry_audited_unload(&me, name, buf), buf, err, errlen);
}

const char *fentry_current_mode(void)
{
	return fentry_mode();
}
