/* costs.c - status's "costs": what applying, reverting and unloading took, and the memory held. */
#include <math.h>
#include <string.h>

#include "core/costs.h"

static double or_zero(double v)
{
	return isfinite(v) ? v : 0.0;
}

static void op_json(struct fentry_buf *out, const char *key, const struct fentry_op_cost *c)
{
	fentry_buf_printf(out, ",\"%s\":", key);
	if (c->at == 0.0) {
		fentry_buf_printf(out, "null");
		return;
	}
	fentry_buf_printf(out, "{\"seconds\":%.6f,\"at\":%.6f,\"ok\":%s,\"name\":", or_zero(c->seconds),
			  or_zero(c->at), c->ok ? "true" : "false");
	fentry_buf_json_string(out, c->name);
	fentry_buf_printf(out, "}");
}

FENTRY_HIDDEN void fentry_costs_json(struct fentry_buf *out)
{
	struct fentry_costs c;

	memset(&c, 0, sizeof(c));
	fentry_costs_snapshot(&c);
	fentry_buf_printf(out, ",\"costs\":{\"startup\":{\"seconds\":%.6f,\"sites_written\":%llu}",
			  (double)c.poke.startup_ns / 1e9, (unsigned long long)c.poke.startup_sites);
	op_json(out, "last_apply", &c.apply);
	op_json(out, "last_revert", &c.revert);
	op_json(out, "last_unload", &c.unload);
	fentry_buf_printf(out, ",\"sites_written\":%llu,\"batches\":%llu,\"last_batch_seconds\":%.6f",
			  (unsigned long long)c.poke.sites_written, (unsigned long long)c.poke.batches,
			  (double)c.poke.last_batch_ns / 1e9);
	fentry_buf_printf(out, ",\"trampolines\":%llu,\"sites_direct\":%llu",
			  (unsigned long long)c.poke.trampolines,
			  (unsigned long long)c.poke.sites_direct);
	fentry_buf_printf(out, ",\"unload_checks\":{\"runs\":%llu,\"threads_blocked\":%llu,"
			  "\"threads_signalled\":%llu}", (unsigned long long)c.checks.checks,
			  (unsigned long long)c.checks.threads_blocked,
			  (unsigned long long)c.checks.threads_signalled);
	fentry_buf_printf(out, ",\"memory\":{\"tables\":%llu,\"trampolines\":%llu,\"sites\":%llu,"
			  "\"patch_copies\":%llu,\"patch_mappings\":%llu}}",
			  (unsigned long long)c.table_bytes, (unsigned long long)c.poke.trampoline_bytes,
			  (unsigned long long)c.poke.heap_bytes, (unsigned long long)c.copy_bytes,
			  (unsigned long long)c.mapped_bytes);
}
