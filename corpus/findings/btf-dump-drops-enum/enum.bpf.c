enum t1 { T1_0 = 34 };
enum t1 v0 = 0;
char LICENSE[4] __attribute__((section("license"), used)) = "GPL";
