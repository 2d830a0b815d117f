; Scores of one KV block for a group of 4 query heads sharing one KV head: for each of the n
; positions t, K row t at %ka + t * %stride bytes (d = 16 * %nc floats) is dotted with the 4
; pre-scaled query rows at %qa (4 x d floats, head-major) and the 4 scores are stored at
; %sa + 16 t bytes (position-major). Each K chunk is loaded once for the 4 heads.
; The placeholder line in block %red is replaced by cpu_decode._reduce4_ir() (the 4
; horizontal sums into %z).

define float @mistralpy_attn_qk4(i64 %ka, i64 %qa, i64 %sa, i64 %n, i64 %stride, i64 %nc) {
entry:
  %k0 = inttoptr i64 %ka to ptr
  %q = inttoptr i64 %qa to ptr
  %s = inttoptr i64 %sa to ptr
  %hs = mul i64 %nc, 16
  br label %pos
pos:
  %t = phi i64 [0, %entry], [%t1, %red]
  %koff = mul i64 %t, %stride
  %k = getelementptr i8, ptr %k0, i64 %koff
  br label %chunk
chunk:
  %c = phi i64 [0, %pos], [%c1, %chunk]
  %a0 = phi <16 x float> [zeroinitializer, %pos], [%a0n, %chunk]
  %a1 = phi <16 x float> [zeroinitializer, %pos], [%a1n, %chunk]
  %a2 = phi <16 x float> [zeroinitializer, %pos], [%a2n, %chunk]
  %a3 = phi <16 x float> [zeroinitializer, %pos], [%a3n, %chunk]
  %co = mul i64 %c, 16
  %kp = getelementptr float, ptr %k, i64 %co
  %kv = load <16 x float>, ptr %kp, align 4
  %q0p = getelementptr float, ptr %q, i64 %co
  %q0 = load <16 x float>, ptr %q0p, align 4
  %q1p = getelementptr float, ptr %q0p, i64 %hs
  %q1 = load <16 x float>, ptr %q1p, align 4
  %q2p = getelementptr float, ptr %q1p, i64 %hs
  %q2 = load <16 x float>, ptr %q2p, align 4
  %q3p = getelementptr float, ptr %q2p, i64 %hs
  %q3 = load <16 x float>, ptr %q3p, align 4
  %a0n = call <16 x float> @llvm.fma.v16f32(<16 x float> %q0, <16 x float> %kv, <16 x float> %a0)
  %a1n = call <16 x float> @llvm.fma.v16f32(<16 x float> %q1, <16 x float> %kv, <16 x float> %a1)
  %a2n = call <16 x float> @llvm.fma.v16f32(<16 x float> %q2, <16 x float> %kv, <16 x float> %a2)
  %a3n = call <16 x float> @llvm.fma.v16f32(<16 x float> %q3, <16 x float> %kv, <16 x float> %a3)
  %c1 = add i64 %c, 1
  %cd = icmp eq i64 %c1, %nc
  br i1 %cd, label %red, label %chunk
red:
REDUCE4
  %so = mul i64 %t, 4
  %sp = getelementptr float, ptr %s, i64 %so
  store <4 x float> %z, ptr %sp, align 4
  %t1 = add i64 %t, 1
  %td = icmp eq i64 %t1, %n
  br i1 %td, label %exit, label %pos
exit:
  ret float 0.0
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
