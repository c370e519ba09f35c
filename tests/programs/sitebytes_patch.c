/* sitebytes_patch.c - the new entry_probe, calling the original too. */
#include <fentry.h>

FENTRY_DECLARE_ORIGINAL(entry_probe);

static int entry_probe_new(int x)
{
	int (*orig)(int) = FENTRY_ORIGINAL(entry_probe, int (*)(int));

	return orig(x) + 99; /* x + 1 + 99 */
}

FENTRY_REPLACE(entry_probe, entry_probe_new);
