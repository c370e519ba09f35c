/* lib_plugin_patch.c - replaces plugin_value() of lib_plugin.so (matched by build-id). */
#include <fentry.h>

static int plugin_value_fixed(int x)
{
	return x * 10 + 1;
}

FENTRY_REPLACE(plugin_value, plugin_value_fixed);
