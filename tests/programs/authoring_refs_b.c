/* authoring_refs_b.c - a second static `state`, so that FENTRY_REF(state, ...) is ambiguous. */
static int state = 100;

__attribute__((noinline, noclone)) int state_b(int x)
{
	state += x;
	return state;
}
