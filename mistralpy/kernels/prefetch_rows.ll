; Prefetches n rows of `lines` cache lines each (row t at %pa + t * %stride bytes) into L1:
; the next KV block of a task, whose address only the block table knows.

define float @mistralpy_prefetch_rows(i64 %pa, i64 %n, i64 %stride, i64 %lines) {
entry:
  %p0 = inttoptr i64 %pa to ptr
  br label %row
row:
  %t = phi i64 [0, %entry], [%t1, %rowdone]
  %off = mul i64 %t, %stride
  %r = getelementptr i8, ptr %p0, i64 %off
  br label %line
line:
  %l = phi i64 [0, %row], [%l1, %line]
  %lo = mul i64 %l, 64
  %lp = getelementptr i8, ptr %r, i64 %lo
  call void @llvm.prefetch.p0(ptr %lp, i32 0, i32 3, i32 1)
  %l1 = add i64 %l, 1
  %ld = icmp eq i64 %l1, %lines
  br i1 %ld, label %rowdone, label %line
rowdone:
  %t1 = add i64 %t, 1
  %td = icmp eq i64 %t1, %n
  br i1 %td, label %exit, label %row
exit:
  ret float 0.0
}
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
