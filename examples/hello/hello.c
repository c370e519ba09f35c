/* hello.c - the smallest live-patchable program: my_function is replaced by a patch. */
#include <stdio.h>

void my_function(int x)
{
	printf("my function: %d!\n", x);
}

int main(void)
{
	my_function(123);
	return 0;
}
