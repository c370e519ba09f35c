/*
 * statics_main.c - with static_a.c and static_b.c: two static functions named `scale`,
 * one per file, and a static function `bias` that only static_a.c has.
 */
#include <stdio.h>

int a_scale(int x);
int b_scale(int x);
int a_bias(int x);

int main(void)
{
	printf("a_scale(5) = %d\n", a_scale(5));
	printf("b_scale(5) = %d\n", b_scale(5));
	printf("a_bias(5) = %d\n", a_bias(5));
	return 0;
}
