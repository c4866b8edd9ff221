-- Row visibility for many callers in one statement: the gateway's SQL check of Postgres Changes
-- under RLS, for policies it cannot decide itself. For each caller i, the prepared statement
-- `statement` (returning the int[] of the batch's keys the current role can select) runs as
-- roles[i] with claims[i] set transaction-locally, as `request.jwt.claims`,
-- `request.jwt.claim.sub` and `request.jwt.claim.role`. A caller whose check raises an error
-- (a `sub` that is not a UUID, no SELECT privilege) gets NULL; the others are unaffected. The
-- caller of this function rolls the transaction back.
create or replace function realtime.visible_key_indexes(
  statement text, roles text[], claims text[], subs text[])
  returns table (caller int, visible int[])
  language plpgsql volatile
as $$
begin
  for i in 1 .. coalesce(array_length(claims, 1), 0) loop
    caller := i;
    begin
      perform set_config('role', roles[i], true),
              set_config('request.jwt.claims', claims[i], true),
              set_config('request.jwt.claim.sub', subs[i], true),
              set_config('request.jwt.claim.role', roles[i], true);
      execute 'execute ' || quote_ident(statement) into visible;
    exception when others then
      visible := null;
    end;
    return next;
  end loop;
end
$$;

revoke execute on function realtime.visible_key_indexes(text, text[], text[], text[]) from public;
