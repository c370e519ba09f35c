/* lib_plugin.c - an instrumented shared library the program loads after start. */
int plugin_value(int x)
{
	return x * 10;
}
